"""Test machinery: fault injection, plaintext recorders and a malicious server. Never referenced by a shipped job.

``pharmafl simulate --drop/--tamper`` and the tests put these components into their own copy of a job; the job
folders under ``jobs/`` (and so every job a site approves) carry none of them.
"""

# Where a faulty site (testing.secure_sum.FaultySecureSumSite) breaks the protocol; `simulate --drop` checks it.
FAULT_PHASES = ("after-setup", "after-upload", "tampered", "mis-sized")
