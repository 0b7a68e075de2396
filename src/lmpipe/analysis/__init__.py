"""Where a model fails: calibration, robustness and the attack, token attributions, slices with CIs."""
