"""What administrators do to the fake wiki: users, roles, attachments, recycle bin, audit log.

Same rules as mutations.py: BookStack's activities in BookStack's order, webhooks POSTed inline
when the activity is logged, and the silent side effects FACTS §2.5 lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from eventsync.testing.models import ALL_PERMISSIONS, Attachment, Role, User, columns
from eventsync.testing.mutations import Completed, MutationBase, NotFoundError
from eventsync.testing.shapes import deletion_row
from eventsync.testing.state import ADMIN_ROLE_ID, ADMIN_USER_ID, admin_permissions


def _role_permissions(role: Role, names: Iterable[str]) -> set[str]:
    """PermissionsRepo::assignRolePermissions: known names only; admin keeps the vital ones."""
    permissions = admin_permissions(names) if role.system_name == "admin" else set(names)
    return permissions & set(ALL_PERMISSIONS)


class AdminMutations(MutationBase):
    """Users and roles, attachments (all silent), the recycle bin and the audit log."""

    # -------------------------------------------------------- users/roles
    def _user(self, user_id: int) -> User:
        user = self.state.users.get(user_id)
        if user is None:
            raise NotFoundError(f"no user with id {user_id}")
        return user

    def _role(self, role_id: int) -> Role:
        role = self.state.roles.get(role_id)
        if role is None:
            raise NotFoundError(f"no role with id {role_id}")
        return role

    async def create_user(
        self,
        name: str,
        email: str,
        roles: Iterable[int] = (),
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        now = self.state.now()
        user = User(
            id=self.state.next_id("users"),
            name=name,
            slug="",
            email=email,
            roles={r for r in roles if r in self.state.roles},
            created_at=now,
            updated_at=now,
            committed=False,
        )
        user.slug = self.state.unique_slug(user, name)
        self.state.users[user.id] = user
        # Logged and POSTed inside DB::transaction: nothing is visible until the commit.
        activity = self._log("user_create", user, acting_user_id, committed=False)
        await self._flush()
        user.committed = activity.committed = True
        return user.id

    async def update_user(
        self,
        user_id: int,
        *,
        name: str | None = None,
        email: str | None = None,
        roles: Iterable[int] | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """UserRepo::update: a role change is a pivot sync, so only name/email move updated_at."""
        user = self._user(user_id)
        before = columns(user)
        if name:  # !empty($data['name']): refreshSlug runs even for the same name
            user.name = name
            user.slug = self.state.unique_slug(user, name)
        if email:
            user.email = email
        if roles is not None:
            user.roles = {r for r in roles if r in self.state.roles}
        self._save(user, before)
        await self._announce("user_update", user, acting_user_id)
        return user.id

    async def delete_user(
        self,
        user_id: int,
        migrate_ownership_to: int | None = None,
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """UserRepo::destroy; ensureDeletable refuses the guest and the only admin."""
        user = self._user(user_id)
        if user.system_name == "public":
            raise ValueError("the guest user cannot be deleted")
        admins = [u for u in self.state.users.values() if ADMIN_ROLE_ID in u.roles]
        if ADMIN_ROLE_ID in user.roles and len(admins) <= 1:
            raise ValueError("the only admin cannot be deleted")
        del self.state.users[user_id]
        for token_id in [t.token_id for t in self.state.tokens.values() if t.user_id == user_id]:
            del self.state.tokens[token_id]
        if migrate_ownership_to and migrate_ownership_to in self.state.users:
            # UserRepo::migrateOwnership: one Eloquent query update per entity type, so the
            # SoftDeletes scope skips trashed items and updated_at is set on every row. Silent.
            now = self.state.now()
            for table in (
                self.state.pages,
                self.state.chapters,
                self.state.books,
                self.state.shelves,
            ):
                for entity in table.values():
                    if entity.owned_by == user_id and not entity.trashed:
                        entity.owned_by = migrate_ownership_to
                        entity.updated_at = now
        await self._announce("user_delete", user, acting_user_id)
        return user.id

    async def sso_group_sync(self, user_id: int, roles: Iterable[int]) -> int:
        """GroupSyncService at login: role membership changes with no event."""
        user = self._user(user_id)
        user.roles = {r for r in roles if r in self.state.roles}
        return user.id

    async def create_role(
        self,
        display_name: str,
        permissions: Iterable[str] = (),
        description: str = "",
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        now = self.state.now()
        role = Role(
            id=self.state.next_id("roles"),
            display_name=display_name,
            description=description,
            created_at=now,
            updated_at=now,
            committed=False,
        )
        role.permissions = _role_permissions(role, permissions)
        self.state.roles[role.id] = role
        activity = self._log("role_create", role, acting_user_id, committed=False)
        await self._flush()
        role.committed = activity.committed = True
        return role.id

    async def update_role(
        self,
        role_id: int,
        *,
        display_name: str | None = None,
        description: str | None = None,
        permissions: Iterable[str] | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """PermissionsRepo::updateRole: permissions are a pivot sync; fill + save the rest."""
        role = self._role(role_id)
        before = columns(role)
        if permissions is not None:
            role.permissions = _role_permissions(role, permissions)
        if display_name is not None:
            role.display_name = display_name
        if description is not None:
            role.description = description
        self._save(role, before)
        await self._announce("role_update", role, acting_user_id)
        return role.id

    async def delete_role(
        self,
        role_id: int,
        migrate_to: int | None = None,
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """PermissionsRepo::deleteRole: migrate, log (webhook POSTed), and only then delete."""
        role = self._role(role_id)
        if role.system_name:
            raise ValueError("system roles cannot be deleted")
        members = [u for u in self.state.users.values() if role_id in u.roles]
        if migrate_to and migrate_to in self.state.roles:
            # $newRole->users()->sync($users): the target's other members are detached.
            for user in self.state.users.values():
                user.roles.discard(migrate_to)
            for user in members:
                user.roles.add(migrate_to)
        for rows in self.state.entity_permissions.values():
            rows.pop(role_id, None)
        for key in [k for k, rows in self.state.entity_permissions.items() if not rows]:
            del self.state.entity_permissions[key]
        await self._announce("role_delete", role, acting_user_id)
        del self.state.roles[role_id]
        for user in self.state.users.values():
            user.roles.discard(role_id)
        return role.id

    # -------------------------------------------------------- attachments
    async def create_attachment(
        self,
        page_id: int,
        name: str,
        *,
        link: str | None = None,
        content: bytes = b"",
        extension: str = "",
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        page = self._page(page_id)
        now = self.state.now()
        order = max(
            (a.order for a in self.state.attachments.values() if a.uploaded_to == page.id),
            default=0,
        )
        attachment_id = self.state.next_id("attachments")
        self.state.attachments[attachment_id] = Attachment(
            id=attachment_id,
            name=name,
            uploaded_to=page.id,
            external=link is not None,
            order=order + 1,
            extension="" if link is not None else extension,
            path=link if link is not None else f"uploads/files/{attachment_id}.{extension}",
            content=b"" if link is not None else content,
            created_at=now,
            updated_at=now,
            created_by=acting_user_id,
            updated_by=acting_user_id,
        )
        return attachment_id

    async def update_attachment(
        self,
        attachment_id: int,
        *,
        name: str | None = None,
        link: str | None = None,
        content: bytes | None = None,
        extension: str | None = None,
        uploaded_to: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """AttachmentService::updateFile: silent; saved (updated_at bumped) only when dirty.

        Nothing sets updated_by on an attachment update, so it keeps the uploader.
        """
        attachment = self._get(self.state.attachments, attachment_id, "attachment")
        before = columns(attachment)
        if name is not None:
            attachment.name = name
        if uploaded_to is not None:
            attachment.uploaded_to = self._page(uploaded_to).id
        if link is not None:
            attachment.external, attachment.path = True, link
            attachment.content, attachment.extension = b"", ""
        if content is not None:
            attachment.external, attachment.content = False, content
            attachment.path = f"uploads/files/{attachment_id}.{extension or attachment.extension}"
        if extension is not None and not attachment.external:
            attachment.extension = extension
        if content is not None:
            attachment.updated_at = self.state.now()  # a new upload always gets a new path
        self._save(attachment, before)
        return attachment_id

    async def delete_attachment(self, attachment_id: int) -> int:
        self._get(self.state.attachments, attachment_id, "attachment")
        del self.state.attachments[attachment_id]
        return attachment_id

    # -------------------------------------------------------- recycle bin
    def deletions(self) -> list[dict[str, Any]]:
        """The recycle bin as the API lists it, oldest first."""
        return [deletion_row(self.state, d) for _, d in sorted(self.state.deletions.items())]

    async def recycle_bin_restore(
        self, deletion_id: int, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """DeletionRepo::restore: logged (and POSTed) before anything is restored."""
        deletion = self._get(self.state.deletions, deletion_id, "deletion")
        await self._announce("recycle_bin_restore", deletion, acting_user_id)
        return self.state.restore_deletion(deletion)

    async def recycle_bin_destroy(
        self, deletion_id: int, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """DeletionRepo::destroy: logged (and POSTed) before the permanent delete."""
        deletion = self._get(self.state.deletions, deletion_id, "deletion")
        await self._announce("recycle_bin_destroy", deletion, acting_user_id)
        return self.state.destroy_deletion(deletion)

    async def recycle_bin_empty(self, *, acting_user_id: int = ADMIN_USER_ID) -> int:
        count = 0
        for deletion_id in sorted(self.state.deletions):
            deletion = self.state.deletions.get(deletion_id)
            if deletion is not None:
                count += self.state.destroy_deletion(deletion)
        await self._announce("recycle_bin_empty", "", acting_user_id)
        return count

    # ----------------------------------------------------------- audit log
    def clear_activity(self) -> Completed:
        """bookstack:clear-activity. Runs at once; awaiting the result is optional."""
        self.state.clear_activity()
        return Completed()

    async def log_ignored_activity(
        self, type: str, detail: str = "", *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """Log an activity eventsync does not act on (auth_login, settings_update...)."""
        activity = self._log(type, detail, acting_user_id)
        await self._flush()
        return activity.id
