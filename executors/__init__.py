"""Executors: run algorithm containers on one runtime each, behind one small interface."""
