"""HTTP on the wire: the server, the messages, the upstream client, header rules. Imports no other layer."""
