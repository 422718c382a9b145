"""What runs are turned into for people: tables, groups and significance, plots, run names."""
