"""Privacy at the site: DP-SGD accounting and the site's privacy ledger (and, later, keys and certificates)."""
