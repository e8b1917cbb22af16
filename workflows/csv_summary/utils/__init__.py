"""Small helpers of the csv_summary workflow."""
