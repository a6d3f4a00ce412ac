"""The request path every mode shares (``idemproxy.pipeline``): what a duplicate gets, answers kept byte for byte."""
