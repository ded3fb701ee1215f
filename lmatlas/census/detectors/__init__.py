"""Built-in head detectors: one module each; importing a module registers its detector."""
