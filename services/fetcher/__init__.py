"""The fetcher: turns `session_messages` triggers and gateway requests into cart deliveries."""
