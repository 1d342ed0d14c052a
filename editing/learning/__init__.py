"""The learned editors' machinery (MEND, KE, SERAC): gradient factors and shifts, target scoring,
training records, the one training loop and its checkpoint format."""
