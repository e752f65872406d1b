"""Worst-case attacker sweeps (durability report card)."""
