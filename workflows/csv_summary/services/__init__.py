"""The csv_summary workflow's larger pieces of logic."""
