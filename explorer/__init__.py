"""What the command line and the server share: drawing the views of an analysis, exports, the checks on every
field, the one cache."""
