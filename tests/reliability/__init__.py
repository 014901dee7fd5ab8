"""Fault-injection, crash, restart and soak tests of the whole pipeline on loopback."""
