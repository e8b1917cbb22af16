"""Small helpers of the compress workflow."""
