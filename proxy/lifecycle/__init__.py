"""An operation's states and transitions, as pure functions free of I/O."""
