"""The compress workflow's larger pieces of logic."""
