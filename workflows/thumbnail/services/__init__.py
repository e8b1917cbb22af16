"""The thumbnail workflow's larger pieces of logic."""
