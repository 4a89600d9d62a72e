"""The control plane that is not an actor: the daemon and its control socket, the Runtime that wires
the actors to the I/O loop, rollouts, process watching, timers, and the metric roll-ups."""
