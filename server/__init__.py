"""What only the served app needs: the page's events, the endpoints and their shared handlers, the workspace and
its model store, managed files, the request guard, ZeroGPU, the settings."""
