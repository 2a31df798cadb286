"""One module per benchmark scenario family, each with its markdown table builder."""
