"""Many controllers, one lab: rigs as labgrid places.

labgrid brings the coordinator, one exporter per controller, places with tags, reservations and locks; this
package only adapts to it (a lock backend, an exporter configuration generated from rig files, the ``hil lab``
flows) and never reimplements a scheduler or an RPC. labgrid's gRPC has no authentication, so nothing here
talks to a coordinator off the loopback address unless the rig file or an option allows it.
"""
