"""The management plane: accounts, signed API access, activation credentials, metering,
billing and arrears (`ems manage serve`), and what daemons need to obey it."""
