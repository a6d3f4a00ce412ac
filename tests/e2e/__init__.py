"""End to end across layers: real ``idemproxy run`` processes, several instances, trust edges."""
