"""Generation backends behind one interface (`base.ChatBackend`), chosen by configuration."""
