"""What the app and the command line share: views of an analysis, the analysis cache, exports."""
