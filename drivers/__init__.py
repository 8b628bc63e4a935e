"""Hardware adapters: each turns one kind of device into pseudonymised Readings."""
