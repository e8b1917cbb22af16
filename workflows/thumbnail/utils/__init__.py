"""Small helpers of the thumbnail workflow."""
