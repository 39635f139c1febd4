"""What tunnelmesh writes for other tools: OpenSSH's known_hosts and ssh_config, plain WireGuard configs."""
