"""Every reason a sharding stage counts a sample under, with what it means: one place, so the counters in
``manifest.json`` / ``report.json`` and the table in README.md cannot drift apart (a test compares them).

``skipped`` reasons leave a sample out; ``renamed`` reasons keep it under a recorded name that differs from
its file's. Image conversions (``converted``) are named by what was converted (``png_palette``, ``cmyk``...)
and are described in :mod:`pipeline.data.images`.
"""

from __future__ import annotations

import re

# the image itself (pipeline.data.images)
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
IMAGE_TOO_SMALL = "image_too_small"
UNSUPPORTED_IMAGE = "unsupported_image"
# an ImageNet-style tree (pipeline.data.imagenet_source)
MISSING_LABEL = "missing_label"
UNKNOWN_CLASS = "unknown_class"
UNREADABLE_FILE = "unreadable_file"
DANGLING_LINK = "dangling_link"
NOT_A_REGULAR_FILE = "not_a_regular_file"
UNREADABLE_DIRECTORY = "unreadable_directory"
DIRECTORY_LOOP = "directory_loop"
# captioned samples and their metadata (pipeline.data.datacomp_source)
NOT_IN_SUBSET = "not_in_uid_subset"
DUPLICATE_UID = "duplicate_uid"
DUPLICATE_KEY = "duplicate_key"
MISSING_UID = "missing_uid"
BAD_UID = "bad_uid"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
ASPECT_RATIO_TOO_LARGE = "aspect_ratio_too_large"
BAD_JSON = "bad_json"
# downloads (pipeline.data.fetch_limits, and img2dataset's error messages)
MISSING_URL = "missing_url"
BAD_URL = "bad_url"
URL_SCHEME_NOT_ALLOWED = "url_scheme_not_allowed"
CONNECT_TIMEOUT = "connect_timeout"
DOWNLOAD_DEADLINE = "download_deadline"
RESPONSE_TOO_LARGE = "response_too_large"
HTTP_STATUS = "http_NNN"  # written as http_404, http_500, ...
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
DISALLOWED_BY_ROBOTS = "disallowed_by_robots"
RESIZE_FAILED = "resize_failed"
DOWNLOAD_FAILED = "download_failed"
# image/mask pairs of a segmentation dataset (pipeline.data.segmentation_source)
MISSING_MASK = "missing_mask"
ORPHAN_MASK = "orphan_mask"
CORRUPT_MASK = "corrupt_mask"
UNSUPPORTED_MASK = "unsupported_mask"
MASK_SIZE_MISMATCH = "mask_size_mismatch"
LABEL_OUT_OF_RANGE = "label_out_of_range"
# kept under another name
NAME_NOT_UTF8 = "name_not_utf8"

SKIPPED = {
    EMPTY_FILE: "the file or downloaded body has zero bytes",
    NOT_AN_IMAGE: "the bytes are not an image format PIL knows (an HTML error page, a text file, ...)",
    TRUNCATED_IMAGE: "the image data ends early",
    CORRUPT_IMAGE: "the image header or data cannot be decoded",
    TOO_MANY_PIXELS: "width x height above `max_pixels` (decompression bombs are refused from the header)",
    IMAGE_TOO_SMALL: "the shorter side is below the minimum size",
    UNSUPPORTED_IMAGE: "a pixel mode that cannot become RGB",
    MISSING_LABEL: "an ImageNet file with no class: outside any class folder, or absent from the label list",
    UNKNOWN_CLASS: "a class folder or label that is not one of the train classes",
    UNREADABLE_FILE: "the file cannot be read (permissions, I/O error)",
    DANGLING_LINK: "a symbolic link whose target does not exist",
    NOT_A_REGULAR_FILE: "a FIFO, socket or device file (never opened: reading one could block forever)",
    UNREADABLE_DIRECTORY: "a folder inside a class folder that cannot be listed",
    DIRECTORY_LOOP: "a folder link that leads back to one of its own parent folders (not followed again)",
    NOT_IN_SUBSET: "the uid is not in `uid_subset` (counted, not listed: the subset is a selection)",
    DUPLICATE_UID: "a uid seen earlier in the input; the first sample is kept",
    DUPLICATE_KEY: "a key seen earlier in the same input shard (a later parquet row or tar sample); the first is "
                   "kept",
    MISSING_UID: "the uid is null or empty",
    BAD_UID: "a sample's json uid is neither an integer, a string nor bytes",
    MISSING_IMAGE: "the sample has no .jpg/.jpeg/.png/.webp member",
    MISSING_CAPTION: "the sample has no .txt member",
    EMPTY_CAPTION: "the caption is empty or only whitespace",
    CAPTION_NOT_UTF8: "the caption bytes are not UTF-8",
    CAPTION_TOO_SHORT: "the caption is shorter than `min_caption_chars`",
    CAPTION_TOO_LONG: "the caption is longer than `max_caption_chars`",
    ASPECT_RATIO_TOO_LARGE: "long side / short side above `max_aspect_ratio`",
    BAD_JSON: "the sample's .json is not a JSON object",
    MISSING_URL: "the url is null or empty (dropped before the download)",
    BAD_URL: "the url cannot be parsed (dropped before the download)",
    URL_SCHEME_NOT_ALLOWED: "the url's scheme is not in `url_schemes` (default http, https), e.g. file:// "
                            "(dropped before the download)",
    CONNECT_TIMEOUT: "no connection (TCP, and TLS for https) within `connect_timeout_s`",
    DOWNLOAD_DEADLINE: "the whole request (connect, headers, body, redirects) took longer than `timeout_s`",
    RESPONSE_TOO_LARGE: "the response (by Content-Length, or counted while streaming) exceeded "
                        "`max_response_bytes`",
    HTTP_STATUS: "the server answered with that HTTP error status",
    TIMEOUT: "a network operation timed out (img2dataset's message, e.g. in shards made elsewhere)",
    CONNECTION_ERROR: "the connection failed (refused, reset, DNS)",
    DISALLOWED_BY_ROBOTS: "an X-Robots-Tag header forbids use of the image",
    RESIZE_FAILED: "img2dataset could not resize the image",
    DOWNLOAD_FAILED: "any other download failure img2dataset reported",
    MISSING_MASK: "a segmentation image with no annotation of the same name",
    ORPHAN_MASK: "a segmentation annotation with no image of the same name",
    CORRUPT_MASK: "the annotation is empty, not a PNG, or cannot be decoded",
    UNSUPPORTED_MASK: "the annotation is not a single-channel PNG of class indices (e.g. an RGB colour mask)",
    MASK_SIZE_MISMATCH: "the annotation's width and height differ from its image's",
    LABEL_OUT_OF_RANGE: "the annotation holds a value that is neither a class (1..`num_classes` with "
                        "`reduce_zero_label`, else 0..`num_classes` - 1) nor the ignore value 255",
}
RENAMED = {
    NAME_NOT_UTF8: "the file name is not valid UTF-8: kept, with the undecodable bytes written as \\xNN in the "
                   "sample's `path` and `path_escaped: true`",
}
_HTTP = re.compile(r"^http_\d{3}$")


def is_documented(reason: str) -> bool:
    """Whether ``reason`` is one of :data:`SKIPPED` or :data:`RENAMED` (``http_404`` counts as ``http_NNN``)."""
    return reason in SKIPPED or reason in RENAMED or bool(_HTTP.match(reason))
