"""Policies: what may run here (images, organizations, users, resources) and isolation rules."""
