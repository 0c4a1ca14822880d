"""Peers the bench compares oddsgate with, and their idempotent installer."""
