# The client's version follows the API: the major is the proto package's (referral.v1), the minor
# grows with every backwards-compatible addition to the API, the patch with fixes of this package.
__version__ = "1.0.0"
