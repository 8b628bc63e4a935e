"""Coverage-guided entry points (atheris / libFuzzer), one per boundary.

    python tests/fuzz/atheris_targets.py TARGET [libFuzzer flags] [corpus_dir ...]
    python tests/fuzz/atheris_targets.py escpos -atheris_runs=100000 tests/fuzz/corpus/escpos
    python tests/fuzz/atheris_targets.py all -atheris_runs=5000 DIR   # every target at once
    python tests/fuzz/atheris_targets.py --list

``all`` multiplexes: the first byte of an input picks the target (sorted names, modulo
their count), the rest is that target's input; ``prefixed_corpus`` builds its corpus from
the kept one.  One process, one start-up: what CI runs.

Each target is ``tests.fuzz.targets.TARGETS[TARGET]``: the same contract the corpus replay
and the hypothesis properties check, under the same per-input time bound.  Known bugs are
tolerated (``strict=False``) so a run looks for new ones.  A crash writes ``crash-<sha1>``
in the working directory: minimise it, name it ``bug-*`` in ``corpus/TARGET/`` and list it
in ``test_corpus.KNOWN_BUGS`` (or, once fixed, keep it under another name as a regression).
New interesting inputs go to the first corpus directory given; copy the few worth keeping.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))


def main(argv: list[str]) -> int:
    import atheris  # imported here: the module stays importable (and --list works) without it

    with atheris.instrument_imports(include=["drivers", "gateway"]):
        from tests.fuzz.targets import TARGETS, check

    if len(argv) < 2 or (argv[1] not in TARGETS and argv[1] != "all"):
        print(__doc__, file=sys.stderr)
        print("targets: all " + " ".join(sorted(TARGETS)), file=sys.stderr)
        return 2
    logging.disable(logging.CRITICAL)  # rejected pushes log a warning each
    names = sorted(TARGETS)

    def one_input(data: bytes) -> None:
        if argv[1] != "all":
            check(TARGETS[argv[1]], data, strict=False)
        elif data:
            check(TARGETS[names[data[0] % len(names)]], data[1:], strict=False)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()
    return 0


def prefixed_corpus(dest: Path) -> int:
    """The kept corpus as one ``all`` corpus in ``dest``: each file behind its target byte."""
    from tests.fuzz.targets import TARGETS, corpus_files

    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, name in enumerate(sorted(TARGETS)):
        for path in corpus_files(name):
            (dest / f"{name}-{path.name}").write_bytes(bytes([index]) + path.read_bytes())
            count += 1
    return count


if __name__ == "__main__":
    if sys.argv[1:2] == ["--list"]:
        from tests.fuzz.targets import TARGETS

        for name, t in sorted(TARGETS.items()):
            print(f"{name:16} {t.boundary}")
        sys.exit(0)
    sys.exit(main(sys.argv))
