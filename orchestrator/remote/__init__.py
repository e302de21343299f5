"""The remote roles as the orchestrator sees them: typed gRPC clients with response checks, retries
with a budget, and rejoining services that restarted (weights re-sent, the critic reloaded)."""
