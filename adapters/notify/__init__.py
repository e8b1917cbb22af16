"""Notifications: webhooks and alerts driven from the event log."""
