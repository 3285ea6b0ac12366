"""Distillation itself: the loss terms (pure functions), forward hooks, the layer map,
schedules, and the Distiller that turns two models' representations into a scheme's terms.
Builds on kd/core and kd/data."""
