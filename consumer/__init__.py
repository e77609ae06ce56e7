"""smsq: the daemon that turns notification messages into paced, never-repeated SMS."""
