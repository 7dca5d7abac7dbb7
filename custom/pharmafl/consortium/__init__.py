"""Running pharmafl as a consortium: POC, provisioned kits, submission, site policies and job approval."""
