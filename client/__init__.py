"""medfed ClientApp: what runs at each hospital site."""
