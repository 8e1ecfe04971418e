"""The CLI's commands that are not the export pipeline: check, inspect, bench, demo."""
