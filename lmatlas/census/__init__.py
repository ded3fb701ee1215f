"""Head census: classify every attention head by behaviour, with null baselines and confidence."""
