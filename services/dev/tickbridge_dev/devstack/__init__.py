"""Real servers for tests, the demo, load and chaos runs: started on free ports, stopped by PID."""
