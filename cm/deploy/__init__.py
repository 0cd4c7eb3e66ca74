"""Running cm on a site's own machines (docs/DEPLOY.md): `cmdaemon config|keys|install|uninstall|db`."""
