"""The web mask painter: a page the bot serves where a user paints the mask over their own image."""
