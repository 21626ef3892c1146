"""The box side: `pluginctl agent`, the one process that touches a workspace's disk. It
registers and heartbeats for its workspace, serves the runtime API to the controller, and
installs plugins for real (`sources` fetches, `tree` checks and digests, `disk` stages and
swaps them in) — or, for tests and demos only, in memory (`simulated`)."""
