"""Cross-cutting fuzz suite (issue 7): every parser and decoder boundary, one corpus."""
