"""Runners of the conversion: local processes or an Apache Beam pipeline, the same bytes."""
