"""The Discord side: triggers, slash commands, attachments and streamed replies."""
