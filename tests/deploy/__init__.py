"""Deployment artefacts: the Dockerfile, the container image and the Helm chart."""
