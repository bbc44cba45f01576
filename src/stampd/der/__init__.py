"""DER codec for TSP (RFC 3161) and CMS (RFC 5652): strict decoding of requests and tokens, fast encoding.

The only package that imports the ASN.1 library.
"""
