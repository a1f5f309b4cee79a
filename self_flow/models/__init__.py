"""Model code: modules only, no mesh, no training logic."""
