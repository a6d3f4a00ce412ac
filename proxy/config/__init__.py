"""Configuration: the YAML/env schema, its parsers and the route table. Imports no other layer."""
